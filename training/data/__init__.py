"""Training data: Label Studio exports and COCO files read into one `Sample` type.

Every loader returns `(samples, SkipReport)`: rows that cannot be used are counted by reason,
never dropped silently, so a user can see why a project yields fewer training images than tasks.
"""

from .types import Instance, Sample, SkipReport

__all__ = ["Instance", "Sample", "SkipReport"]
