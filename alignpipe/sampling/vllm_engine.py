"""`alignpipe generate --engine vllm`: the same `Sampler.sample` contract on vLLM (imported only when asked).

Same schema as the transformers engine: token ids (EOS included when sampled), text with special tokens
skipped and cut before a stop string, finish reason eos | stop | length, and the behaviour log-prob as the
sum of the raw model log-probs of the sampled tokens (`logprobs_mode="raw_logprobs"`, vLLM >= 0.10).
Each prompt gets its own seed derived from the batch seed, so vLLM's scheduling does not change the
samples. A PEFT adapter policy is served as a LoRA on its base model. Never needed by the tests.
"""
from __future__ import annotations

from pathlib import Path

from alignpipe.core.errors import UserError
from alignpipe.sampling.engine import Sample, SamplingParams, cut_at_stop, derive_seed, eos_token_ids


def require_vllm():
    """The vllm module, or a one-line UserError when it is not installed or no GPU is visible."""
    try:
        import vllm
    except ImportError:
        raise UserError("--engine vllm: vllm is not installed (pip install vllm, on a CUDA machine); "
                        "or use --engine transformers") from None
    import torch

    if not torch.cuda.is_available():
        raise UserError("--engine vllm: needs a CUDA GPU and none is visible here; use --engine transformers")
    return vllm


def _generation_config(folder: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError):
        return None


class VllmSampler:
    def __init__(self, policy: Path, tokenizer, params: SamplingParams, *, dtype: str = "bfloat16",
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1):
        vllm = require_vllm()
        from alignpipe.models.loading import adapter_base, is_adapter

        self.tokenizer, self.params, self.lora = tokenizer, params, None
        base, kwargs = Path(policy), {}
        if is_adapter(policy):
            import json

            from vllm.lora.request import LoRARequest

            base = Path(adapter_base(policy))
            rank = json.loads((Path(policy) / "adapter_config.json").read_text()).get("r", 16)
            kwargs = {"enable_lora": True, "max_lora_rank": max(8, int(rank))}
            self.lora = LoRARequest("policy", 1, str(policy))
        try:
            self.llm = vllm.LLM(model=str(base), tokenizer=tokenizer.name_or_path, dtype=dtype,
                                trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                                logprobs_mode="raw_logprobs", **kwargs)
        except TypeError:  # vLLM before logprobs_mode
            self.llm = vllm.LLM(model=str(base), tokenizer=tokenizer.name_or_path, dtype=dtype,
                                trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                                **kwargs)
        self.eos = eos_token_ids(tokenizer, _generation_config(base))

    def _params(self, seed: int):
        from vllm import SamplingParams as VllmParams

        p = self.params
        return VllmParams(n=p.num_samples, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1,
                          max_tokens=p.max_new_tokens, stop=list(p.stop) or None, stop_token_ids=self.eos,
                          logprobs=0, seed=seed, skip_special_tokens=True, include_stop_str_in_output=False)

    def sample(self, prompts: list[list[int]], seed: int | list[int], batch_size: int | None = None) -> list[Sample]:
        """As `Sampler.sample`; vLLM schedules the batch itself, so `batch_size` is not used."""
        from vllm.inputs import TokensPrompt

        seeds = [derive_seed(seed, i) for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        params = [self._params(s) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 lora_request=self.lora, use_tqdm=False)
        result = []
        for out in outs:
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                logp = sum(step[t].logprob for step, t in zip(c.logprobs or [], ids))
                if c.finish_reason == "length":
                    reason, text = "length", c.text
                elif isinstance(c.stop_reason, str):
                    reason, text = "stop", cut_at_stop(c.text, self.params.stop)
                else:
                    reason, text = "eos", c.text
                result.append(Sample(ids, text, reason, float(logp)))
        return result
