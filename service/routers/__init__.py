"""One router per resource: health, metrics, models (v1 scoring), v2 (Open Inference Protocol)
and admin."""
