"""Inference engines behind one protocol (`base.Engine`); concrete engines load lazily via
`registry` so optional heavy libraries are imported only by the engine that needs them."""
