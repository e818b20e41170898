"""One router per protocol the server speaks: OpenAI (completions, chat, models), KServe Open
Inference Protocol v2 (health, metadata, infer) and ``/v1/classify``."""
