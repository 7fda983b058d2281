"""``python -m local_backend serve|seed ...``"""

from local_backend.cli import backend

if __name__ == "__main__":
    backend(prog_name="python -m local_backend")
