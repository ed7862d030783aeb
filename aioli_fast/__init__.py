"""aioli_fast: online data mixing (Aioli) for LLM pretraining at production speed.

Layers (imports run one way): ``train`` -> {``model``, ``data``, ``mixing``, ``kernels``};
``kernels`` imports nothing of the package.
"""

__version__ = "0.1.0"
