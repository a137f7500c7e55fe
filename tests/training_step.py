"""The check that two models train alike: one loss and its gradients, compared."""
import torch


def assert_same_training_step(reference, model, loss_fn, loss_tol=None, grad_tol=None):
    """`model`'s loss_fn(model) and parameter gradients are `reference`'s; gradients are reset first.

    Tolerances are assert_close's (rtol, atol): by default 1e-5, 1e-6 for the loss and 1e-4, 1e-6 for gradients.
    """
    results = []
    for m in (reference, model):
        m.zero_grad()
        loss = loss_fn(m)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in m.named_parameters() if p.grad is not None}))
    (ref_loss, ref_grads), (loss, grads) = results
    loss_rtol, loss_atol = loss_tol or (1e-5, 1e-6)
    grad_rtol, grad_atol = grad_tol or (1e-4, 1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=loss_atol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=grad_rtol, atol=grad_atol, msg=name)
