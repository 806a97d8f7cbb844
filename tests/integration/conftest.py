from tests.integration.worker import celery_worker

__all__ = ["celery_worker"]
