"""Integrations with timm, transformers, torchvision, open_clip and segment_anything; each imports its library
lazily."""
