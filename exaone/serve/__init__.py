"""`exaone serve`: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

`prepare(ServeOptions(...))` finds or builds the engine and loads it; `serve(state)` runs the server;
`BackgroundServer(state)` runs it in a thread. docs/serve.md describes the API.
"""
