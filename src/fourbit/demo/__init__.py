"""The built-in demo: fourbit's own generated fine-tuning task (task.py) and the default run's
settings (config.py). Data and settings, not library: the CLI's default run and the tests and
benchmarks import it; nothing below the CLI does."""
