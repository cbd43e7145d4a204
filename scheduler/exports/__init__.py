"""What a finished run's maps become for other tools: cropped regions and pseudo-label masks."""
