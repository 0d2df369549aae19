"""`medusa-export serve`: an OpenAI-compatible server (FastAPI + uvicorn) with Medusa metrics and bounded
queueing, and the same app as a Ray Serve deployment (`ray_app`). Needs the ``serve`` extra."""
