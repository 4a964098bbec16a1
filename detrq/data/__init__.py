"""Datasets: COCO-layout loading, transforms, sampling, and the synthetic generator."""
