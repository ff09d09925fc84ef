"""Label Studio I/O: everything that reads or writes Label Studio's formats and talks to its server.

Label config parsing, interactive prompts, result and brush RLE formats, percent/pixel geometry, task image
loading, and the guarded client (address, token, export). It sits between the model (`ovsam`) and its users
(`training`, `labelstudio_backend`, `bench`) and imports none of them but `ovsam`.
"""
