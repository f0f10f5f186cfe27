"""Inference: KV-cached contexts, recovery sampling, text decoding and the interleaved reasoner.

Training imports this package (RL rollouts, the reasoning stage's recoveries, evaluation), never
the other way round.
"""
