"""The science of the study: SpeechLLM, layer redundancy, pruning, healing, metrics.

Plain PyTorch + transformers + peft. This package never imports ray or mlflow.
"""
