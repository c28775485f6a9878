"""The vLLM settings a PHD model needs, applied by vLLM's per-architecture config hook (MODELS_CONFIG_MAP).

Each feature the plugin cannot hold yet is turned off here with one log line, before the engine is built:
- prefix caching: a cached prefix gives a request its originals' K/V but not the hidden window of SWA / CSWA
  (kept per request outside the paged cache), and the plugin keys that window by the request's first block;
- chunked prefill: the bounded prefill computes a request's hidden tokens from its whole prompt in one step;
- CUDA graphs / torch.compile: the forward sizes the hidden set from the batch's metadata on the host.
Speculative decoding would verify several draft tokens per step, each needing its own hidden copies: refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger("vllm.phd")  # under vLLM's logger, so that its handler prints these lines


class PHDServingConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        from vllm.config.compilation import CompilationMode, CUDAGraphMode

        if vllm_config.speculative_config is not None:
            raise ValueError("PHD models do not support speculative decoding yet: drop the speculative config")
        cache, scheduler, model = vllm_config.cache_config, vllm_config.scheduler_config, vllm_config.model_config
        if cache.enable_prefix_caching:
            logger.info("PHD: prefix caching off (the hidden window is per-request state, not in the paged cache)")
            cache.enable_prefix_caching = False
        if scheduler.enable_chunked_prefill:
            logger.info("PHD: chunked prefill off (a prompt's hidden tokens are computed in one step)")
            scheduler.enable_chunked_prefill = False
        if scheduler.max_num_batched_tokens < model.max_model_len:
            scheduler.max_num_batched_tokens = model.max_model_len  # a whole prompt must fit one step
        if not model.enforce_eager:
            logger.info("PHD: eager mode (the hidden set is sized on the host each step; no graphs, no compile)")
            model.enforce_eager = True
        compilation = vllm_config.compilation_config
        compilation.mode = CompilationMode.NONE
        compilation.cudagraph_mode = CUDAGraphMode.NONE
