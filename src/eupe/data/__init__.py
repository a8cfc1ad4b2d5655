"""Image sources, mixing, augmentation, resolution pyramids, the teacher-feature cache."""
