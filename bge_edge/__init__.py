"""bge-edge: fast, lean inference for BAAI BGE embedding models.

Subpackages: ``bge_edge.runtime`` (inference), ``bge_edge.kernels`` (numpy scoring),
``bge_edge.export`` (tracing and quantisation; needs the ``[export]`` extra).
"""

__version__ = "0.1.0"
