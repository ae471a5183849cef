"""How the prompt enhancer decodes: shared by each enhancement (``enhance.py``) and the decode
warm-up at load time (``models.py`` -> ``accel.prepare_qwen``), so both record the same graph."""

from __future__ import annotations

from functools import lru_cache

from transformers import StoppingCriteriaList, StopStringCriteria

#: Ends each few-shot example; generation stops when the model writes it.
DELIMITER = "###"


@lru_cache(maxsize=4)
def _stop_at_delimiter(tokenizer) -> StoppingCriteriaList:
    """transformers' stop-string criterion for ``DELIMITER``, built once per tokenizer: building
    it scans the whole vocabulary (about 0.45 s for Qwen's 152k tokens), which ``generate``
    would otherwise repeat on every call given ``stop_strings``."""
    return StoppingCriteriaList([StopStringCriteria(tokenizer, [DELIMITER])])


def generation_kwargs(tokenizer) -> dict:
    """Greedy, a light repetition penalty, stop at the example delimiter."""
    return {
        "do_sample": False,
        "repetition_penalty": 1.05,
        "stopping_criteria": _stop_at_delimiter(tokenizer),
        "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id,
    }
