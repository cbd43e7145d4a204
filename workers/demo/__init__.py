"""The demo CNN shipped with camaudit: a small net trained on ``workers.synth`` shapes.

It exists so that a fresh install can run a complete audit, and so that CAM methods can be
checked against known object boxes without downloading any weights.
"""
