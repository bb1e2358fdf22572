"""llmkit: Lightning modules for pretraining, continual learning and test-time discovery
of small LLMs on one GPU, on a shared mHC backbone."""

__version__ = "0.1.0"
