"""Scoring generated images as subject-driven generation papers do (DreamBench protocol):
DINO, CLIP-I, CLIP-T, their masked variants, diversity, and a weight-free proxy.

Plain library code: no Prefect, DVC or CLI imports. Scoring models load only from local
folders or the local Hugging Face cache; see `scorers` for the random-test fallback.
"""

from .metrics import (
    Score, clip_t, colour_histogram, cosine_matrix, diversity, edge_histogram, fidelity, ingest_masker,
    proxy_similarity, score_subject, subject_crop, summary,
)
from .prompts import PromptSet, class_prompt, evaluation_prompts
from .scorers import (
    PRETRAINED, PROXY, RANDOM_TEST, SCORER_KINDS, ClipScorer, DinoScorer, Scorers, load_clip, load_dino,
    load_scorers, random_clip, random_dino,
)

__all__ = [
    "PRETRAINED", "PROXY", "RANDOM_TEST", "SCORER_KINDS", "ClipScorer", "DinoScorer", "PromptSet", "Score",
    "Scorers", "class_prompt", "clip_t", "colour_histogram", "cosine_matrix", "diversity", "edge_histogram",
    "evaluation_prompts", "fidelity", "ingest_masker", "load_clip", "load_dino", "load_scorers",
    "proxy_similarity", "random_clip", "random_dino", "score_subject", "subject_crop", "summary",
]
