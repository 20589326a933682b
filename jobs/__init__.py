"""Stage jobs of the ad-click fraud retraining pipeline.

Every stage is a command, ``python -m jobs.<stage>``; code shared by several stages
lives in :mod:`jobs.common`.
"""
