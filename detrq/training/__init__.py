"""Training the embedded mini DETR from scratch (backbone pre-training, then DETR), resumable and seeded."""
