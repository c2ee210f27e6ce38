"""Token selection for sparse decode: scores, top-k, Quest pages, policies (issue 13)."""
from posattn.select.policies import Quest, SelectionCache, TidalDecode, TokenSelect
from posattn.select.quest import PageSummary, expand_pages, page_scores, page_summary, update_page_summary
from posattn.select.scores import ScoresKey, scores
from posattn.select.topk import MAX_K, TopkKey, topk
from posattn.select import backends as _backends  # noqa: F401  registers the kernels

__all__ = ["MAX_K", "PageSummary", "Quest", "ScoresKey", "SelectionCache", "TidalDecode", "TokenSelect", "TopkKey",
           "expand_pages", "page_scores", "page_summary", "scores", "topk", "update_page_summary"]
from posattn.vq.policy import A2ATS  # noqa: E402,F401  issue 14: windowed-rotary + query-aware VQ (posattn/vq/policy.py)
