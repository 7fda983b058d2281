"""The worker tier: Celery app, tasks, intake, write-back, and the CLI."""
