"""The train loss of VARTrainer (spec section 6.6/6.7) and the validation metrics of eval_ep (spec section 8.1),
checked against a hand computation on the very logits the trainer saw: the trainer's float32 arithmetic vs the
same formulas in float64, equal up to float32 rounding (a softmax over V, sums over L, a mean over B)."""
import pytest
import torch

from support import assert_equal_up_to_rounding
from trainer import VARTrainer
from utils.amp_sc import AmpOptimizer


def make_trainer(vae, var, label_smooth=0.0):
    opt = torch.optim.SGD(var.parameters(), lr=0.0)
    amp = AmpOptimizer(opt, list(var.parameters()), 'cpu', grad_clip=0.0)
    return VARTrainer(torch.device('cpu'), var.patch_nums, [16 * p for p in var.patch_nums], vae, var, var, amp,
                      label_smooth)


def capture_logits(var):
    """Record every logits_BLV VAR's forward returns."""
    seen = []
    handle = var.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    return seen, handle


def token_ce(logits_BLV, gt_BL, eps):
    """Per-token label-smoothed cross-entropy, written out: (1-eps)*(-log p[gt]) + eps * mean_v(-log p[v])."""
    logp = logits_BLV.double().log_softmax(dim=-1)
    nll = -logp.gather(-1, gt_BL.unsqueeze(-1)).squeeze(-1)
    return (1 - eps) * nll + eps * (-logp.mean(dim=-1))


@pytest.mark.parametrize('ls', [0.0, 0.1])
def test_train_loss_is_the_per_image_sum_of_token_ce_over_L_averaged_over_the_batch(tiny_models, ls):
    vae, var = tiny_models
    trainer = make_trainer(vae, var, label_smooth=ls)
    B, L = 3, trainer.L
    gt_BL = torch.randint(0, trainer.V, (B, L), generator=torch.Generator().manual_seed(1))
    label_B = torch.tensor([0, 4, 7])
    seen, handle = capture_logits(var)
    try:
        out = trainer.train_step(False, gt_BL, label_B)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (B, L, trainer.V)
    tok_BL = token_ce(seen[0], gt_BL, ls)
    expected = (tok_BL / L).sum(dim=1).mean()  # lw = 1/L, sum over tokens, mean over B
    ce = dict(reduction=max(trainer.V, L), depth=3, dtype=torch.float32)  # log-softmax over V, sum over L, mean
    assert_equal_up_to_rounding(out['loss'], expected, **ce)
    if ls == 0:  # without smoothing that is just the mean token cross-entropy
        assert_equal_up_to_rounding(out['loss'], tok_BL.mean(), **ce)
    else:  # and smoothing really changes it
        assert abs(out['loss'].item() - token_ce(seen[0], gt_BL, 0.0).mean().item()) > 1e-3


def test_progressive_stage_warm_up_weights_only_the_current_scale(tiny_models):
    vae, var = tiny_models
    trainer = make_trainer(vae, var)
    B, L = 2, trainer.L
    gt_BL = torch.randint(0, trainer.V, (B, L), generator=torch.Generator().manual_seed(2))
    label_B = torch.tensor([1, 2])
    trainer.train_step(False, gt_BL, label_B, prog_si=1, prog_wp_it=4)  # first stage: no warm-up
    seen, handle = capture_logits(var)
    try:
        out = trainer.train_step(False, gt_BL, label_B, prog_si=2, prog_wp_it=4)  # 1st iteration of a new stage
    finally:
        handle.remove()
    wp = 0.25
    assert out['prog_si'] == 2 and out['prog_wp'] == wp  # 1 / 4 of the warm-up: exact in float64
    bg, ed = trainer.begin_ends[2]
    assert (bg, ed) == (5, 14) and seen[0].shape == (B, ed, trainer.V)
    tok_Bl = token_ce(seen[0], gt_BL[:, :ed], 0.0)
    w_l = torch.full((ed,), 1.0 / L, dtype=torch.float64)  # the full L, even in progressive mode
    w_l[bg:ed] *= wp  # only the current scale's tokens are warmed up
    expected = (tok_Bl * w_l).sum(dim=1).mean()
    assert_equal_up_to_rounding(out['loss'], expected, reduction=max(trainer.V, L), depth=3, dtype=torch.float32)


def test_eval_ep_accuracy_and_losses_match_a_hand_computation(tiny_models):
    vae, var = tiny_models
    trainer = make_trainer(vae, var)
    L, last_l, V = trainer.L, trainer.last_l, trainer.V
    assert (L, last_l) == (30, 16)
    g = torch.Generator().manual_seed(3)
    batches = []
    for B, keep in ((2, 0.6), (3, 0.3)):
        label_B = torch.randint(0, 10, (B,), generator=g)
        gt_BL = torch.randint(0, V, (B, L), generator=g)
        force_BL = torch.rand(B, L, generator=g) < keep
        # the logits of scale si depend only on the tokens of the scales before it (teacher forcing): setting scale
        # by scale some tokens to the model's own argmax makes them correct predictions, so the accuracy is sizable
        with torch.no_grad():
            for bg, ed in trainer.begin_ends:
                pred = var(label_B, trainer.tokenize(gt_BL)[1]).argmax(dim=-1)
                gt_BL[:, bg:ed] = torch.where(force_BL[:, bg:ed], pred[:, bg:ed], gt_BL[:, bg:ed])
        batches.append((gt_BL, label_B))

    n_correct = n_tail = 0
    L_mean = L_tail = 0.0
    with torch.no_grad():
        for gt_BL, label_B in batches:
            logits = var(label_B, trainer.tokenize(gt_BL)[1])
            hit_BL = logits.argmax(dim=-1) == gt_BL
            n_correct += hit_BL.sum().item()
            n_tail += hit_BL[:, -last_l:].sum().item()
            B = gt_BL.shape[0]
            L_mean += token_ce(logits, gt_BL, 0.0).mean().item() * B
            L_tail += token_ce(logits[:, -last_l:], gt_BL[:, -last_l:], 0.0).mean().item() * B
    tot = sum(b[0].shape[0] for b in batches)
    assert n_correct > L  # the accuracy is far from 0 (a wrong normaliser would show)

    vL_mean, vL_tail, acc_mean, acc_tail, n, _ = trainer.eval_ep(batches)
    assert n == tot == 5
    assert 0 <= acc_mean <= 100 and 0 <= acc_tail <= 100
    # % of correct tokens: float64 arithmetic on counts (per-batch products, their sum, a division)
    assert_equal_up_to_rounding(acc_mean, 100 * n_correct / (tot * L), reduction=len(batches), depth=3)
    assert_equal_up_to_rounding(acc_tail, 100 * n_tail / (tot * last_l), reduction=len(batches), depth=3)
    # the same logits (the same forward on the same batches); the cross-entropy means in float32 vs float64
    ce = dict(reduction=max(V, 3 * L), depth=3, dtype=torch.float32)
    assert_equal_up_to_rounding(vL_mean, L_mean / tot, **ce)
    assert_equal_up_to_rounding(vL_tail, L_tail / tot, **ce)


def test_tokenize_through_a_bf16_encoder_copy(tiny_models):
    """train.py --vbf16: the trainer tokenizes images through the bf16 copy's img_to_idxBl -- ids of the right shape
    and range, mostly those of the float32 encode (a share near ties may flip), and the teacher-forcing input built
    from those very ids; the default trainer still uses the tokenizer's own (float32) method."""
    from models.lowp import EncoderCopy
    vae, var = tiny_models
    torch.manual_seed(3)
    imgs = torch.rand(4, 3, 64, 64) * 2 - 1
    ref_BL, ref_x = make_trainer(vae, var).tokenize(imgs)
    assert torch.equal(ref_BL, torch.cat(vae.img_to_idxBl(imgs), 1))
    trainer = make_trainer(vae, var)
    trainer.encode = EncoderCopy(vae, torch.bfloat16).img_to_idxBl
    gt_BL, x_BLCv = trainer.tokenize(imgs)
    assert gt_BL.shape == ref_BL.shape and gt_BL.dtype == torch.long and 0 <= gt_BL.min() and gt_BL.max() < vae.V
    assert (gt_BL == ref_BL).float().mean() > 0.8
    ids = [gt_BL[:, bg:ed] for bg, ed in trainer.begin_ends]
    assert torch.equal(x_BLCv, vae.quantize.idxBl_to_var_input(ids))
