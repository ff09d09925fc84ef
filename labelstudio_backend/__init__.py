"""Label Studio ML backend for Open-Vocabulary SAM."""
