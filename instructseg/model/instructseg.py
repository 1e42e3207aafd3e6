"""InstructSegModel: vision encoder + OVP + LLM (LoRA) + VMTF + mask decoder, assembled from a `ModelConfig`.

Data flow (one prompt): the key frame's CLIP tokens are pooled and projected into `<img>` slots; OVP summarises the
reference frames, guided by the instruction's word embeddings, into `<ref>` slots; learnable mask queries fill `<mq>`
slots. The LLM's last hidden states give (a) the answer text with [SEG] tokens, (b) object embeddings ([SEG] states
for sam2, mask-query states for mask2former) and (c) the instruction span, which VMTF fuses with the decoder's fine
visual features into E_v. The decoder turns those prompts into masks.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from instructseg.config import ModelConfig
from instructseg.data.training import answer_text
from instructseg.decoders.base import FrameFeatures, MaskDecoder, Prompts
from instructseg.errors import InputError
from instructseg.llm.loading import load_causal_lm, load_tokenizer
from instructseg.llm.lora import apply_lora
from instructseg.model.category_heads import CategoryHeads
from instructseg.model.cell_words import CellWords
from instructseg.model.fusion import TextFusion
from instructseg.model.implied_words import ImpliedWords
from instructseg.model.outputs import Generation, InstructSegOutput, ModelInputs, SequenceStates
from instructseg.model.part_prior import PartPrior
from instructseg.model.perceiver import ObjectAwarePerceiver
from instructseg.model.prompt_norm import PromptNorm
from instructseg.model.position_prior import PositionPrior
from instructseg.model.region_words import RegionWords
from instructseg.model.track_prior import TrackPrior
from instructseg.model.state_norm import StateNorm
from instructseg.model.tokens import IMG, MQ, REF, SEG, PromptLayout
from instructseg.model.vision import VisionEncoder

MAX_LENGTH = 512


def build_decoder(config: ModelConfig) -> MaskDecoder:
    kind = config.decoder.kind
    if kind == "sam2":
        from instructseg.decoders.sam2 import SAM2Decoder

        return SAM2Decoder.from_config(config.decoder)
    if kind == "mask2former":
        from instructseg.decoders.mask2former import Mask2FormerDecoder

        return Mask2FormerDecoder.from_config(config.decoder)
    raise InputError(f"decoder.kind={kind!r}: expected 'sam2' or 'mask2former'")


def _mlp(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, out), nn.GELU(), nn.Linear(out, out))


class InstructSegModel(nn.Module):
    """Build with `InstructSegModel(config)` or `InstructSegModel.from_pretrained(dir_or_preset)`."""

    def __init__(self, config: ModelConfig, *, base_dir: Path | None = None, load_pretrained: bool = True):
        super().__init__()
        self.config = config
        self.tokenizer = load_tokenizer(config.llm, base_dir)
        grid = config.visual_grid
        vocabularies = config.word_vocabularies
        num_ref = config.perceiver.num_latents * config.perceiver.num_ref_frames
        num_queries = config.decoder.num_queries
        num_visual = grid * grid * (1 + len(vocabularies))  # projected tokens, then the word slots
        self.layout = PromptLayout(self.tokenizer, system_prompt=config.llm.system_prompt, num_visual=num_visual,
                                   num_ref=num_ref, num_queries=num_queries, max_length=MAX_LENGTH)
        self.token_ids = self.layout.ids
        llm = load_causal_lm(config.llm, len(self.tokenizer), base_dir)
        hidden = llm.config.hidden_size
        self.llm = apply_lora(llm, config.llm, trainable_tokens=[self.token_ids[SEG]])
        self.vision = VisionEncoder.from_config(config.vision, load_weights=load_pretrained)
        self.vision.requires_grad_(not config.vision.freeze)
        self.decoder = build_decoder(config)
        dim = self.decoder.hidden_dim
        p = config.perceiver
        self.projector = _mlp(self.vision.width, hidden)
        self.perceiver = ObjectAwarePerceiver(vision_width=self.vision.width, text_width=hidden, out_dim=hidden,
                                              dim=p.dim, num_latents=p.num_latents, layers=p.layers, heads=p.heads)
        # N learnable mask queries (mask2former); none for sam2 (a zero-size parameter breaks ZeRO-3)
        # (an Embedding, read through its forward: ZeRO-3 gathers parameters around module calls)
        self.mask_queries = nn.Embedding(num_queries, hidden) if num_queries else None
        if self.mask_queries is not None:
            nn.init.normal_(self.mask_queries.weight, std=0.02)
        self.object_proj = _mlp(hidden, dim)
        f = config.fusion
        self.fusion = TextFusion(text_width=hidden, dim=dim, layers=f.layers, heads=f.heads,
                                 max_detail_tokens=f.max_detail_tokens)
        self.object_norm, self.text_norm = PromptNorm(dim), PromptNorm(dim)  # prompts cannot collapse
        prior = config.decoder.position_prior
        self.position_prior = PositionPrior(width=hidden, grid=prior) if prior else None
        self.part_prior = PartPrior(width=hidden) if config.decoder.part_prior else None
        self.track_prior = TrackPrior(width=hidden) if config.decoder.track_prior else None
        self.state_norm = StateNorm(hidden)  # loaded with the weights, or calibrated on the base LLM now
        self.category_heads = (CategoryHeads(self.vision.width, dim, config.semantic_classes)
                               if config.semantic_classes else None)  # training aid
        self.cell_words = CellWords(self.vision.width, dim, vocabularies, grid) if vocabularies else None
        if config.region_words and not vocabularies:
            raise InputError("region_words=true needs the words to read: set attribute_names and/or category_names")
        self.region_words = RegionWords(vocabularies) if config.region_words else None
        if config.implied_words and not vocabularies:
            raise InputError("implied_words=true needs the words to imply: set attribute_names and/or category_names")
        self.implied_words = ImpliedWords(vocabularies, width=hidden) if config.implied_words else None
        self.word_ids = {kind: [self.tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in words]
                         for kind, words in (self.cell_words.vocabularies.items() if self.cell_words else ())}
        if load_pretrained:
            self.state_norm.calibrate(self.llm, self.tokenizer)
        self.weight_sources = _initial_sources(config, load_pretrained)

    # -- construction helpers -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, **kwargs) -> "InstructSegModel":
        from instructseg.model.checkpoint import load_model

        return load_model(name_or_dir, **kwargs)

    def save_pretrained(self, directory: str | Path, *, merge_lora: bool = False) -> None:
        from instructseg.model.checkpoint import save_model

        save_model(self, Path(directory), merge_lora=merge_lora)

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    # -- embedding the prompt -------------------------------------------------------------------------------
    def visual_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> raw CLIP patch tokens (B, P, Cv)."""
        return self.vision(frames)

    def cell_word_logits(self, key_tokens: torch.Tensor, features: FrameFeatures) -> dict[str, torch.Tensor]:
        """Word slots' logits per vocabulary (B, grid * grid, words + 1) from the key frame's vision tokens and its
        decoder features (models with word slots)."""
        return self.cell_words(key_tokens, self.vision.grid, features.tokens, features.size)

    def embed(self, inputs: ModelInputs, key_tokens: torch.Tensor | None = None,
              features: FrameFeatures | None = None,
              word_logits: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with `<img>`, `<ref>` and `<mq>` slots filled: (B, L, hidden). `key_tokens`,
        `features` (the key frames' decoder features, which the word slots read) and `word_logits`: when already
        computed."""
        ids = inputs.input_ids
        table = self.llm.get_input_embeddings()
        embeds = table(ids)
        key = self.visual_tokens(inputs.frames) if key_tokens is None else key_tokens
        b, _, width = key.shape
        side = self.vision.grid
        pooled = F.adaptive_avg_pool2d(key.transpose(1, 2).reshape(b, width, *side), self.config.visual_grid)
        visual = self.projector(pooled.flatten(2).transpose(1, 2))
        if self.cell_words is not None:
            if word_logits is None:
                features = self.decoder.encode(inputs.frames) if features is None else features
                word_logits = self.cell_word_logits(key, features)
            words = {kind: torch.stack([table(torch.tensor(t, device=ids.device)).mean(0) for t in tokens])
                     for kind, tokens in self.word_ids.items()}
            visual = torch.cat([visual, self.cell_words.slots(word_logits, words).to(visual.dtype)], dim=1)
        if inputs.ref_frames is None:
            refs = key[:, None].expand(b, self.config.perceiver.num_ref_frames, *key.shape[1:])
        else:
            refs = self.visual_tokens(inputs.ref_frames.flatten(0, 1)).unflatten(0, inputs.ref_frames.shape[:2])
        ovp = self.perceiver(refs, embeds.to(refs.dtype), inputs.instruction_mask)  # (the LLM may run in bf16)
        slots = [(IMG, visual), (REF, ovp)]
        if self.config.decoder.num_queries:  # (config, not the parameter's shape: ZeRO-3 partitions it)
            queries = self.mask_queries(torch.arange(self.config.decoder.num_queries, device=ids.device))
            slots.append((MQ, queries.expand(b, -1, -1)))
        for token, values in slots:
            where = ids == self.token_ids[token]
            if int(where.sum()) != values.shape[0] * values.shape[1]:
                raise ValueError(f"{token}: {int(where.sum())} slots in input_ids, {values.shape[1]} per sample "
                                 "expected: the prompt was not built by this model's PromptLayout")
            embeds = embeds.masked_scatter(where[..., None], values.to(embeds.dtype))
        return embeds

    # -- prompts for the decoder ----------------------------------------------------------------------------
    def prompts(self, hidden: torch.Tensor, input_ids: torch.Tensor, instruction_mask: torch.Tensor,
                features: FrameFeatures, *, prior: bool = True) -> Prompts:
        """Decoder prompts from the last hidden states (B, L, hidden) of a full sequence; `prior`: with the position
        prior's maps and the part prior's weights (when the model has them)."""
        hidden = self.state_norm(hidden.float())  # (the LLM may run in bf16)
        token = SEG if self.config.decoder.kind == "sam2" else MQ
        where = input_ids == self.token_ids[token]
        counts = where.sum(1)
        # at least one (invalid) slot: the decoder then runs on every batch, so every rank's gradient hooks fire
        # the same way under DeepSpeed even when a micro-batch holds only chat or no-target samples
        n = max(int(counts.max()), 1)
        b = hidden.shape[0]
        slots = hidden.new_zeros(b, n, hidden.shape[-1])
        valid = torch.arange(n, device=hidden.device)[None] < counts[:, None]
        slots = slots.masked_scatter(valid[..., None], hidden[where])
        text = self.text_norm(self.fusion(hidden.to(features.tokens.dtype), instruction_mask, features.tokens))
        objects = self.object_norm(self.object_proj(slots.to(text.dtype)), valid)
        where = parts = None
        if prior and (self.position_prior is not None or self.part_prior is not None):
            words = self.instruction_words(input_ids, instruction_mask)[:, None].expand(*valid.shape, -1)
            where = None if self.position_prior is None else self.position_prior(words, valid)
            parts = None if self.part_prior is None else self.part_prior(words, valid)
        return Prompts(object_embeds=objects, object_valid=valid, text_embed=text, position_logits=where,
                       part_weights=parts)

    def instruction_words(self, input_ids: torch.Tensor, instruction_mask: torch.Tensor) -> torch.Tensor:
        """(B, hidden): the mean input embedding of each sample's instruction tokens (the LLM's own word table; no
        picture in it), what the position prior reads."""
        words = self.llm.get_input_embeddings()(input_ids).float()
        mask = instruction_mask[..., None].float()
        return (words * mask).sum(1) / mask.sum(1).clamp(min=1)

    # -- forward / generate ---------------------------------------------------------------------------------
    def forward(self, inputs: ModelInputs, *, track: bool | None = None) -> InstructSegOutput:
        """Teacher-forced forward. With `track` (default: in training, when the batch has reference frames) the
        objects are also followed through the reference frames (SAM2 memory), to learn propagation."""
        features = self.decoder.encode(inputs.frames)
        key_tokens = self.visual_tokens(inputs.frames)
        words = self.cell_word_logits(key_tokens, features) if self.cell_words is not None else None
        out = self.llm(inputs_embeds=self.embed(inputs, key_tokens, features, words),
                       attention_mask=inputs.attention_mask, output_hidden_states=True)
        prompts = self.prompts(out.hidden_states[-1], inputs.input_ids, inputs.instruction_mask, features)
        track = (self.training and inputs.ref_frames is not None) if track is None else track
        tracked_masks = tracked_scores = None
        if track:  # SAM2 tracks in the direction away from the key frame; the outputs are in time order
            backward = inputs.ref_backward if inputs.ref_backward is not None and bool(inputs.ref_backward.any()) \
                else None  # (one host sync per forward, and none for clips that all run forwards)
            decoded, refs = self.decoder.track(features, prompts, _reverse_rows(inputs.ref_frames, backward))
            tracked_masks = _reverse_rows(torch.stack([r.mask_logits for r in refs], dim=1), backward)
            tracked_scores = _reverse_rows(torch.stack([r.score_logits for r in refs], dim=1), backward)
        else:
            decoded = self.decoder.decode(features, prompts)
        vision_classes = decoder_classes = None
        if self.category_heads is not None:
            vision_classes, decoder_classes = self.category_heads(key_tokens, self.vision.grid, features.tokens,
                                                                  features.size)
        return InstructSegOutput(logits=out.logits, mask_logits=decoded.mask_logits,
                                 score_logits=decoded.score_logits, object_valid=prompts.object_valid,
                                 text_embed=prompts.text_embed, track_mask_logits=tracked_masks,
                                 track_score_logits=tracked_scores,
                                 text_align_logits=features.grounding(prompts.text_embed[:, None])[:, 0],
                                 object_align_logits=self.decoder.grounding(features, prompts),
                                 vision_class_logits=vision_classes, decoder_class_logits=decoder_classes,
                                 word_logits=words)

    @torch.no_grad()
    def generate(self, inputs: ModelInputs, *, max_new_tokens: int | None = None,
                 features: FrameFeatures | None = None, **generate_kwargs) -> Generation:
        """Greedy answer for one prompt (B = 1); every [SEG] in it becomes one object. `generate_kwargs` go to
        transformers' `generate` (e.g. a `logits_processor`). The decoder prompts come from the hidden states the
        generation itself computed (prompt + answer), so no second pass over the sequence is needed."""
        if inputs.input_ids.shape[0] != 1:
            raise ValueError("generate takes one prompt at a time")
        features = self.decoder.encode(inputs.frames) if features is None else features
        embeds = self.embed(inputs, features=features)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask, do_sample=False,
                                max_new_tokens=max_new_tokens or self.config.llm.max_new_tokens,
                                eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                                suppress_tokens=[self.token_ids[t] for t in (IMG, REF, MQ)],
                                output_hidden_states=True, return_dict_in_generate=True, **generate_kwargs)
        new = out.sequences
        full = ModelInputs(frames=inputs.frames, ref_frames=inputs.ref_frames,
                           input_ids=torch.cat([inputs.input_ids, new], dim=1),
                           attention_mask=torch.ones(1, inputs.input_ids.shape[1] + new.shape[1],
                                                     dtype=inputs.attention_mask.dtype, device=new.device),
                           instruction_mask=F.pad(inputs.instruction_mask, (0, new.shape[1]), value=False))
        # step 0 holds the prompt's states, step i the state of the i-th new token fed back; the last new token is
        # never fed back, which matters only when it is a [SEG] (generation stopped by max_new_tokens)
        hidden = torch.cat([step[-1] for step in out.hidden_states], dim=1)
        if new.shape[1] and new[0, -1] == self.token_ids[SEG]:
            states = self.states(full, embeds=torch.cat([embeds, self.llm.get_input_embeddings()(new)], dim=1))
        else:
            hidden = F.pad(hidden, (0, 0, 0, full.input_ids.shape[1] - hidden.shape[1]))
            states = SequenceStates(hidden, full.input_ids, full.instruction_mask,
                                    video=inputs.ref_frames is not None)
        prompts = self.prompts_for(states, features)
        raw = self.tokenizer.decode(new[0], skip_special_tokens=False)
        raw = raw.split(self.tokenizer.eos_token)[0] if self.tokenizer.eos_token else raw
        text = answer_text(raw)
        return Generation(text=text, raw_text=raw.strip(), num_objects=prompts.object_embeds.shape[1],
                          prompts=prompts, features=features, states=states)

    @torch.no_grad()
    def states(self, inputs: ModelInputs, *, embeds: torch.Tensor | None = None,
               features: FrameFeatures | None = None) -> SequenceStates:
        """One teacher-forced pass over a prompt whose answer is already in `input_ids` (B = 1); `features`: its
        key frame's decoder features, when already computed."""
        embeds = self.embed(inputs, features=features) if embeds is None else embeds
        out = self.llm(inputs_embeds=embeds, attention_mask=inputs.attention_mask, output_hidden_states=True,
                       logits_to_keep=1)  # only hidden states are needed: skip most of the LM head
        return SequenceStates(out.hidden_states[-1], inputs.input_ids, inputs.instruction_mask,
                              video=inputs.ref_frames is not None)

    @torch.no_grad()
    def prompts_for(self, states: SequenceStates, features: FrameFeatures) -> Prompts:
        """Decoder prompts on the frame of `features` (B = 1): exactly one object slot per [SEG] of the answer.
        The object embeddings depend on the states only; VMTF fuses the instruction with this frame's features. No
        position or part prior for a video (see `SequenceStates.video`)."""
        prompts = self.prompts(states.hidden, states.input_ids, states.instruction_mask, features,
                               prior=not states.video)
        return self._select(prompts, states.input_ids, features)

    @torch.no_grad()
    def track_weights(self, states: SequenceStates) -> torch.Tensor | None:
        """(K, TRACK_FEATURES + 1): the track prior's weights and bias for each of the answer's K [SEG] objects
        (`instructseg.inference.track_choice`); None without a track prior."""
        if self.track_prior is None:
            return None
        k = int((states.input_ids == self.token_ids[SEG]).sum())
        return self.track_prior.each(self.instruction_words(states.input_ids, states.instruction_mask).expand(k, -1))

    def implied(self, states: SequenceStates) -> dict[str, set[str]]:
        """The words the implied-words head reads in the instruction of `states` (B = 1), {vocabulary: {word}}; {}
        without the head."""
        if self.implied_words is None:
            return {}
        return self.implied_words.implied(self.instruction_words(states.input_ids, states.instruction_mask)[0])

    def condition(self, inputs: ModelInputs, features: FrameFeatures) -> Prompts:
        """Decoder prompts for one prompt whose answer is already in `input_ids` (B = 1), on its own key frame."""
        return self.prompts_for(self.states(inputs, features=features), features)

    def _select(self, prompts: Prompts, input_ids: torch.Tensor, features: FrameFeatures) -> Prompts:
        """Exactly one object slot per [SEG] of the sequence (B = 1)."""
        k = int((input_ids == self.token_ids[SEG]).sum())
        if self.config.decoder.kind == "mask2former":
            return self._top_queries(features, prompts, k)
        return prompts.objects(slice(0, k))

    def _top_queries(self, features: FrameFeatures, prompts: Prompts, k: int) -> Prompts:
        """mask2former: keep the k queries that match the instruction best (k = number of [SEG])."""
        scores = self.decoder.decode(features, prompts).score_logits[0]
        keep = scores.topk(min(k, scores.numel())).indices.sort().values
        return prompts.objects(keep)


def _initial_sources(config: ModelConfig, load_pretrained: bool) -> dict[str, str]:
    """Where each component's weights come from, for `instructseg model info`."""
    llm = "random init" if config.llm.random_init else f"pretrained ({config.llm.source})"
    vision = f"pretrained ({config.vision.name}, {config.vision.pretrained})" if (
        config.vision.pretrained and load_pretrained) else "random init"
    decoder = f"pretrained ({config.decoder.checkpoint})" if config.decoder.checkpoint else "random init"
    sources = {"llm": llm, "lora": "new (no adapter loaded)", "vision": vision, "decoder": decoder}
    for part in ("projector", "perceiver", "mask_queries", "object_proj", "fusion", "object_norm", "text_norm",
                 "category_heads", "cell_words", "region_words", "implied_words", "position_prior", "part_prior",
                 "track_prior"):
        sources[part] = "random init"
    sources["state_norm"] = "calibrated on the base LLM" if load_pretrained else "not calibrated"
    return sources


def load_model(name_or_dir: str | Path, **kwargs) -> InstructSegModel:
    """A preset name ("tiny", "smol", "default") or a directory written by `save_pretrained`."""
    return InstructSegModel.from_pretrained(name_or_dir, **kwargs)


def _reverse_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """`x` (B, R, ...) with dimension 1 reversed in the rows where `rows` (B,) is True (none when None)."""
    return x if rows is None else torch.where(rows.view(-1, *[1] * (x.dim() - 1)), x.flip(1), x)
