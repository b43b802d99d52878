"""Requests from a message bus: messages turned into jobs, job events published back.

``requests`` is the bus-neutral part (a message's body and attributes checked exactly as
``POST /v1/jobs`` checks a request, and submitted idempotently); ``events`` renders a job's
events for a bus; ``pubsub`` is the Google Cloud Pub/Sub intake and publisher.
"""
