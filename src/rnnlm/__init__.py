"""rnnlm: recurrent language models on NLTK corpora, from DVC pipeline to ONNX inference."""

__version__ = "0.1.0"
