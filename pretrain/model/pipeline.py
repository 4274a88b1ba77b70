"""The same Llama cut into DeepSpeed pipeline stages (used when parallel.pp > 1).

Stages pass tuples between them: (hidden, position_ids[, document_ids]). Layer 0 embeds,
layers 1..N are the blocks, then the head: the final norm, whose output goes to the loss
function, which projects it to the vocabulary and computes the loss chunk by chunk
(pretrain.model.loss) with the head's weight. That weight belongs to the head layer (untied)
or to the embedding module itself (tied: a TiedLayerSpec shared with layer 0 that passes the
hidden states through on the last stage).

DeepSpeed names parameters by layer index ("3.attention.qkv_proj.weight"); canonical_name()
maps them to the names of the single-stage model ("layers.2.attention.qkv_proj.weight"), which
seed the initial weights and are what checkpoints and exports use."""

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import ProcessTopology
from torch import nn

from pretrain.model.args import ExecutionArgs, LlamaArgs
from pretrain.model.llama import (
    Block, RMSNorm, megatron_layer_config, output_projection, vocab_embedding,
)
from pretrain.model.loss import linear_cross_entropy
from pretrain.model.moe import MoE
from pretrain.model.sequence_parallel import split_tokens
from pretrain.model.weights import drop_empty_extra_state, initialize, mark_tensor_parallel

TIED_KEY = "embedding"
Z_LOSS = "z_loss"  # the name the pipeline engine reports the z-loss under


class EmbeddingStage(nn.Module):
    """(tokens, position_ids[, document_ids]) -> (hidden, position_ids[, document_ids])."""

    def __init__(self, args: LlamaArgs, tp_group):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = False  # set by pretrain.model.parallelize
        self.embedding = vocab_embedding(args, megatron_layer_config(tp_group.size()), tp_group)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        tokens, *rest = inputs
        hidden = self.embedding(tokens)
        return (split_tokens(hidden, self.tp_group) if self.sequence_parallel else hidden, *rest)


class PipelineBlock(Block):
    """A block as a stage layer; a mixture of experts records its load and router losses here (its
    losses train through its output: pretrain.model.moe.attach_router_losses)."""

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, position_ids, *document_ids = inputs
        hidden = super().forward(hidden, position_ids, *document_ids)
        if isinstance(self.mlp, MoE) and torch.is_grad_enabled():
            self.mlp.record_load()
            self.mlp.record_losses()
        return (hidden, position_ids, *document_ids)


class FinalNormStage(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.final_norm = RMSNorm(args.hidden_size, args.norm_eps)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.final_norm(inputs[0])


class HeadStage(FinalNormStage):
    """Final norm, and the untied output projection's weight, which the loss function applies."""

    def __init__(self, args: LlamaArgs, tp_group):
        super().__init__(args)
        self.output = output_projection(args, megatron_layer_config(tp_group.size()), tp_group, tied=False)


class HeadLoss:
    """The last stage's loss_fn: the output head and the next-token loss of the final norm's
    output, `chunk_tokens` tokens at a time (pretrain.model.loss), the z-loss part of the last
    loss kept in `last_z_loss`."""

    def __init__(self, weight: nn.Parameter, vocab_size: int, tp_group, z_loss: float):
        self.weight, self.vocab_size, self.tp_group, self.z_loss = weight, vocab_size, tp_group, z_loss
        self.chunk_tokens = ExecutionArgs.loss_chunk_tokens  # set by pretrain.model.execution
        self.sequence_parallel, self.cp_group = False, None  # set by pretrain.model.parallelize
        self.last_z_loss = torch.zeros(())

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        loss, self.last_z_loss = linear_cross_entropy(hidden, labels, self.weight, self.vocab_size, self.tp_group,
                                                      self.chunk_tokens, reduction, self.sequence_parallel,
                                                      self.cp_group, self.z_loss)
        return loss


class Pipeline(PipelineModule):
    """DeepSpeed's PipelineModule that reports the last stage's z-loss (with model.z_loss): the
    pipeline engine averages it like the loss and sends it to every stage. `head_loss` is the
    last stage's HeadLoss (loss_fn, unless an evaluation wraps it)."""

    def __init__(self, *args, reports_z_loss: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.reports_z_loss = reports_z_loss
        self.head_loss: HeadLoss | None = None

    def get_additional_losses(self) -> dict[str, torch.Tensor] | None:
        if not self.reports_z_loss:
            return None
        return {Z_LOSS: self.head_loss.last_z_loss if self.head_loss is not None else torch.zeros(())}


def _pass_hidden(_module: EmbeddingStage, hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def layer_specs(args: LlamaArgs, tp_group) -> list:
    layer_config = megatron_layer_config(tp_group.size())
    blocks = [LayerSpec(PipelineBlock, args, layer_config, tp_group, layer) for layer in range(args.num_layers)]
    if not args.tie_embeddings:
        return [LayerSpec(EmbeddingStage, args, tp_group), *blocks, LayerSpec(HeadStage, args, tp_group)]
    tied = dict(tied_weight_attr="embedding.weight")
    return [TiedLayerSpec(TIED_KEY, EmbeddingStage, args, tp_group, **tied), *blocks, LayerSpec(FinalNormStage, args),
            TiedLayerSpec(TIED_KEY, EmbeddingStage, args, tp_group, forward_fn=_pass_hidden, **tied)]


def canonical_name(name: str, num_layers: int) -> str:
    """DeepSpeed's layer-indexed parameter name -> the single-stage model's name."""
    first, rest = name.split(".", 1)
    if first == "tied_modules":
        return rest.split(".", 1)[1]  # tied_modules.<key>.embedding.weight
    index = int(first)
    return f"layers.{index - 1}.{rest}" if 1 <= index <= num_layers else rest


def pipeline_name(name: str, args: LlamaArgs) -> str:
    """The single-stage model's name -> DeepSpeed's layer-indexed name (canonical_name's inverse)."""
    if name == "embedding.weight":
        return f"tied_modules.{TIED_KEY}.{name}" if args.tie_embeddings else f"0.{name}"
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        return f"{int(index) + 1}.{rest}"
    return f"{args.num_layers + 1}.{name}"  # final_norm.weight, output.weight


PARTITION_METHODS = {"blocks": "type:PipelineBlock", "parameters": "parameters", "uniform": "uniform"}


def build_pipeline(args: LlamaArgs, tp_group, topology: ProcessTopology, partition: str,
                   seed: int) -> PipelineModule:
    """This rank's stage of the pipeline, with the same initial weights as Llama(args).init_weights(seed).
    On the last stage `loss_fn(hidden, labels[, reduction="sum"])` is the output head and the mean
    loss (HeadLoss); other stages have none."""
    module = Pipeline(layers=layer_specs(args, tp_group), topology=topology,
                      partition_method=PARTITION_METHODS[partition], reports_z_loss=args.z_loss > 0)
    mark_tensor_parallel(module)
    drop_empty_extra_state(module)
    initialize(module, seed, args.init_std, args.num_layers, tp_group.rank(), tp_group.size(),
               canonical=lambda name: canonical_name(name, args.num_layers))
    if module.stage_id == module.num_stages - 1:
        module.loss_fn = module.head_loss = HeadLoss(head_weight(module, args), args.vocab_size, tp_group, args.z_loss)
    return module


def head_weight(module: PipelineModule, args: LlamaArgs) -> nn.Parameter:
    """The output head's weight on the last stage: the tied embedding's, or the head's own."""
    head = module.tied_modules[TIED_KEY].embedding if args.tie_embeddings else module.forward_funcs[-1].output
    return head.weight
