"""Start SLMOps Studio: python app.py, then open http://127.0.0.1:7860 (settings: README)."""

from studio.cli import main

if __name__ == "__main__":
    main(["ui"])
