"""The Kopf operator: pure builders, the job state machine and thin handlers. Never imports torch."""
