"""Heuristic output quality, the seed's dimensions: format compliance, hallucination risk,
relevance, and their weighted composite (0 bad .. 1 good). Cheap enough for a sample of
production traffic; run off the caller's path by the recorder."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

WEIGHTS = {"format_compliance": 0.3, "hallucination_risk": 0.4, "relevance": 0.3}

_HEDGES = (
    "may",
    "might",
    "could",
    "possibly",
    "likely",
    "approximately",
    "it appears",
    "based on",
    "according to",
    "generally",
)
_ABSOLUTES = (
    "always",
    "never",
    "definitely",
    "certainly",
    "everyone knows",
    "it is a fact",
    "undoubtedly",
    "without a doubt",
)
_STOPWORDS = frozenset(
    {"the", "and", "for", "that", "this", "with", "from", "have", "been", "what", "about"}
)
_WORD = re.compile(r"\b\w{4,}\b")
_CLAIM = re.compile(r"\b\d{4}\b|\b\d+(?:\.\d+)?%|\$[\d,]+")
_SENTENCE_END = re.compile(r"[.!?]+")


@dataclass(frozen=True)
class QualityScores:
    format_compliance: float
    hallucination_risk: float
    relevance: float
    composite: float


def _markers(markers: tuple[str, ...]) -> re.Pattern[str]:
    # Whole words, so "mayor" is not a hedge and "overall" is not "all"; one scan for them all.
    return re.compile(r"\b(?:" + "|".join(re.escape(m) for m in markers) + r")\b")


_HEDGE = _markers(_HEDGES)
_ABSOLUTE = _markers(_ABSOLUTES)


def format_compliance(output: str, expected_format: str = "text") -> float:
    score = 1.0
    if expected_format == "json":
        try:
            json.loads(output)
        except ValueError:
            score = 0.0
    elif expected_format == "markdown":
        has_headers = bool(re.search(r"^#{1,6}\s", output, re.MULTILINE))
        has_lists = bool(re.search(r"^\s*(?:[*-]|\d+\.)\s", output, re.MULTILINE))
        score = 0.5 * has_headers + 0.5 * has_lists
    words = len(output.split())
    if expected_format != "json" and words < 10:
        score *= 0.5  # suspiciously short
    elif words > 5000:
        score *= 0.8  # probably rambling
    return round(score, 3)


def hallucination_risk(output: str) -> float:
    """Higher is better: hedged, sourced statements over unqualified absolutes and figures."""
    lowered = output.lower()
    sentences = max(len([s for s in _SENTENCE_END.split(output) if s.strip()]), 1)
    hedges = len(_HEDGE.findall(lowered)) / sentences
    absolutes = len(_ABSOLUTE.findall(lowered)) / sentences
    claims = len(_CLAIM.findall(output)) / sentences
    score = 1.0 - 0.3 * absolutes - 0.1 * claims + 0.1 * hedges
    return round(max(0.0, min(1.0, score)), 3)


def relevance(output: str, prompt: str) -> float:
    """Share of the prompt's content words found in the output, scaled (1.5x, capped at 1)."""
    wanted = {w.lower() for w in _WORD.findall(prompt)} - _STOPWORDS
    if not wanted:
        return 0.5  # nothing to compare against
    found = {w.lower() for w in _WORD.findall(output)}
    return round(min(1.0, 1.5 * len(wanted & found) / len(wanted)), 3)


def score(output: str, prompt: str, expected_format: str = "text") -> QualityScores:
    parts = {
        "format_compliance": format_compliance(output, expected_format),
        "hallucination_risk": hallucination_risk(output),
        "relevance": relevance(output, prompt),
    }
    composite = sum(parts[name] * weight for name, weight in WEIGHTS.items())
    return QualityScores(composite=round(composite, 3), **parts)
