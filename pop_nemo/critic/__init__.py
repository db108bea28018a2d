"""The rubric writer and judge: in-process (local.py) or behind HTTP (server.py, client.py)."""
