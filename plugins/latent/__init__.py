"""Latent generative modelling: the ``autoencoder`` kind, the ``sd_vae`` VAE, latent data and caches.

* kind ``autoencoder`` (section ``[autoencoder]``): a frozen image autoencoder
  (`plugins.latent.interface.Autoencoder`); component ``sd_vae`` (diffusers' AutoencoderKL).
* data ``latent``: a wrapped image source's latents (cached in shards); data ``resized``.
* metric ``decoded``: any sample metric on decoded images.
* command ``flowforge encode EXPERIMENT.toml``: writes the latent cache, on any number of processes.

Every continuous family (rectified flow, flow matching, DDPM) trains on ``[data] plugin = "latent"``
unchanged: the data source hands it latents and draws pictures by decoding them.
"""

from registry import hookimpl

FLOWFORGE_API = 1


@hookimpl
def flowforge_register_kinds(register_kind):
    register_kind("autoencoder", doc="a frozen image autoencoder (latent modelling): encode, decode")


@hookimpl
def flowforge_register(register):
    register("autoencoder", "sd_vae", "plugins.latent.autoencoder:make_sd_vae", "plugins.latent.autoencoder:SDVAEConfig",
             doc="diffusers' AutoencoderKL from a local folder or .safetensors file (SD / SD3 VAEs), frozen")
    register("data", "latent", "plugins.latent.data:make_latent", "plugins.latent.data:LatentConfig",
             doc="another source's images as autoencoder latents (cached in memory-mapped shards)")
    register("data", "resized", "plugins.latent.data:make_resized", "plugins.latent.data:ResizedConfig",
             doc="another source's images resized to size x size (bilinear)")
    register("metric", "decoded", "plugins.latent.metrics:make_decoded", "plugins.latent.metrics:DecodedConfig",
             doc="a sample metric (FID, KID, ...) on decoded images of a latent run")


@hookimpl
def flowforge_register_commands(register):
    register("encode", "write the latent cache of an experiment's [data] (any number of processes)",
             "plugins.latent.command:add_arguments", "plugins.latent.command:main")
