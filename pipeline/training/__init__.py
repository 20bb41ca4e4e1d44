"""Training: the loop, exact resume, DDP and teacher-target warping."""
