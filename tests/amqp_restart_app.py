"""A Celery app with the bridge worker's own configuration and one trivial task.

For broker-restart tests that need a real worker on a real RabbitMQ but not the rest
of the stack: everything but the queue and the imports is ``worker.app.celery_config``.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from kombu import Queue

from config import Settings
from worker.app import celery_config

QUEUE = os.environ["RESTART_TEST_QUEUE"]
DONE_FILE = os.environ["RESTART_TEST_DONE_FILE"]

app = Celery("amqp_restart")
app.conf.update(celery_config(Settings(broker_url=os.environ["RESTART_TEST_BROKER"])))
app.conf.update(
    imports=[],
    task_queues=[Queue(QUEUE, routing_key=QUEUE)],
    task_default_queue=QUEUE,
    task_default_exchange="",
    task_default_routing_key=QUEUE,
)


@app.task(name="restart_test.done")
def done(i: int) -> None:
    """Stand in for a short job; one line per run (O_APPEND: whole lines from threads)."""
    time.sleep(0.05)
    with open(DONE_FILE, "a") as f:
        f.write(f"{i}\n")
