"""Knowledge distillation in `fit(teacher=...)` and `distillation_loss`."""
import copy

import pytest
import torch
import torch.nn.functional as F

from vqlab import evaluate, fit, get_model, load_dataset, train_or_load
from vqlab.train import distillation_loss


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.9])
def test_teacher_equal_to_student_only_scales_the_cross_entropy_gradient(weight):
    torch.manual_seed(0)
    logits = torch.randn(64, 10, requires_grad=True)
    y = torch.randint(0, 10, (64,))
    (g_kd,) = torch.autograd.grad(distillation_loss(logits, logits.detach(), y, 4.0, weight), logits)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, y), logits)
    torch.testing.assert_close(g_kd, (1 - weight) * g_ce, atol=1e-7, rtol=1e-5)
    if weight < 1:
        nz = g_ce != 0
        assert torch.equal(torch.sign(g_kd[nz]), torch.sign(g_ce[nz]))


def test_soft_term_pulls_the_student_towards_the_teacher():
    torch.manual_seed(1)
    student = torch.randn(32, 10, requires_grad=True)
    teacher = torch.randn(32, 10)
    y = torch.randint(0, 10, (32,))
    loss = distillation_loss(student, teacher, y, temperature=2.0, weight=1.0)
    (g,) = torch.autograd.grad(loss, student)
    with torch.no_grad():
        stepped = student - 0.5 * g
    kl = lambda s: F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(teacher / 2, 1), reduction="batchmean",
                            log_target=True).item()
    assert kl(stepped) < kl(student.detach())


@pytest.mark.parametrize("kw, msg", [(dict(temperature=0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                                     (dict(weight=1.5), "weight"), (dict(weight=-0.1), "weight")])
def test_bad_distillation_numbers_are_named(kw, msg):
    args = dict(temperature=4.0, weight=0.5) | kw
    with pytest.raises(ValueError, match=msg):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), **args)


def test_teacher_with_other_classes_is_refused():
    with pytest.raises(ValueError, match="same classes"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_fit_refuses_the_model_as_its_own_teacher_and_bad_numbers_before_work():
    tr = load_dataset("digits", "train")
    m = get_model("lenet5", input_size=8)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match="separate model"):
        fit(m, tr, teacher=m, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        fit(m, tr, teacher=copy.deepcopy(m), temperature=-1, max_steps=1, progress=False)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_a_student_learns_from_the_teacher_alone():
    """distill_weight=1: the labels are never used, yet a fresh student reaches most of the teacher's accuracy;
    the teacher is not changed and keeps its mode."""
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    teacher, _ = train_or_load("lenet5", "digits", epochs=10, progress=False)      # the committed checkpoint
    t_acc = evaluate(teacher, te)
    teacher.train()
    snapshot = copy.deepcopy(teacher.state_dict())
    torch.manual_seed(1)
    student = get_model("lenet5", input_size=8)
    scrambled = torch.utils.data.TensorDataset(tr.tensors[0], torch.zeros_like(tr.tensors[1]))   # labels gone
    fit(student, scrambled, epochs=25, lr=3e-3, teacher=teacher, distill_weight=1.0, temperature=4.0, progress=False)
    s_acc = evaluate(student, te)
    assert t_acc > 0.9
    assert s_acc > t_acc - 0.08, (s_acc, t_acc)
    assert teacher.training
    assert all(torch.equal(snapshot[k], v) for k, v in teacher.state_dict().items())
