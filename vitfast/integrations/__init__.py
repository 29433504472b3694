"""Integrations with timm, transformers, torchvision and open_clip; each imports its library lazily."""
