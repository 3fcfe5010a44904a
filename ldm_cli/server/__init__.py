"""`ldm serve`: A1111's and OpenAI's image APIs in front of the engine (commands.py), the model
kept loaded between requests. Imported only by `ldm serve`: fastapi and uvicorn load there."""
