"""megatron-core's GPTModel, able to stop before its output layer on the last pipeline stage.

The trainer's fused LM-head op (``ops.lm_head_logprob_entropy``) wants the final hidden states
and the output weight, not the [b, s, V/TP] logits. GPTModel.forward runs embedding -> decoder
(final norm included) -> ``_postprocess`` (output layer, loss); ``hidden_states=True`` returns
what ``_postprocess`` receives instead, so the rest of megatron's forward is untouched. Same
parameters and names as GPTModel: checkpoints and the HF mapping see no difference, and callers
that want logits (sampler, eval) call it as before.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel


class HiddenStatesGPTModel(GPTModel):
    _hidden_out = False

    def forward(self, *args, hidden_states: bool = False, **kwargs):
        """GPTModel.forward; ``hidden_states=True``: the last stage returns the final (normed)
        hidden states [b, s, H] (a transposed view of megatron's [s, b, H]; under sequence
        parallelism all-gathered over the TP group first) instead of logits."""
        self._hidden_out = hidden_states
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._hidden_out = False

    def _postprocess(self, hidden_states, **kwargs):
        if self._hidden_out and self.post_process:
            if self.mtp_process:
                raise ValueError("hidden_states=True does not support multi-token prediction")
            if self.config.sequence_parallel:
                # the output layer's own gather, done here: all-gather the sequence shards; its
                # backward reduce-scatters, so the LM head op leaves dL/dh unreduced
                # (lm_head_logprob_entropy(sequence_parallel=True))
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True)
            return hidden_states.transpose(0, 1)
        return super()._postprocess(hidden_states, **kwargs)

    def output_weight(self):
        """This stage's LM-head weight [V/TP, H] as the output layer would use it: the embedding
        when tied on a stage that holds it, else the output layer's own (under PP with tied
        embeddings megatron keeps the last stage's copy in sync through its gradients)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight
