from ibq.losses.adversarial import LeCAM, hinge_d_loss, non_saturating_g_loss

__all__ = ["LeCAM", "hinge_d_loss", "non_saturating_g_loss"]
