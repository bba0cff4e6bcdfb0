"""Deterministic, physically plausible microscopy phantoms with ground truth, one module per family.

Every generator takes an explicit ``seed`` (``np.random.default_rng(seed)``): the same
arguments give bit-identical arrays. Images are ``float32``, label images ``int32`` in memory
(written as ``uint16`` OME-TIFF by the ``write_*`` helpers). Axis order follows the project:
``ZYX`` / ``CZYX`` for 3D, ``YX`` / ``CYX`` for 2D. Lengths are in micrometres (um), voxel sizes
``spacing_um`` in ``ZYX`` (or ``YX``) order; voxel ``i`` sits at ``i * spacing`` um.

Generators (modules :mod:`~common.synthetic.cell_field`, :mod:`~common.synthetic.isl2d`,
:mod:`~common.synthetic.dic`, :mod:`~common.synthetic.fucci`; shared optics, noise and geometry in
:mod:`~common.synthetic.optics`; data-set writers in :mod:`~common.synthetic.writers`):

:func:`make_cell_field_3d`
    Adherent cells in a 3D field. A refractive-index (RI) map (medium < cytoplasm < nucleus <
    nucleolus, cytoplasmic granules) gives the transmitted-light (bright-field) stack: a weak
    absorption/scattering term (objects slightly dark) plus the defocus (transport-of-intensity)
    term ``-int (z - z') lap_xy dn(z') dz'`` limited by partial coherence, which is odd in
    defocus, so an object is bright on one side of focus and dark on the other and invisible
    in its own focal plane. The DNA (Hoechst) target has textured nuclei with dark nucleoli,
    per-nucleus brightness, an anisotropic Gaussian PSF, out-of-focus haze, debris, Poisson shot
    and Gaussian read noise and a camera offset.
:func:`make_isl_2d`
    Sparse 2D cells (optical path-length map) seen as two defocused bright-field planes
    (contrast of opposite sign), Zernike phase contrast (dark cells with a bright halo) and a
    DAPI stain, with nucleus and cell instance labels (nucleus ``k`` lies in cell ``k``).
:func:`make_dic_membrane_2d`
    Densely packed touching cells (a weighted Voronoi tessellation of seeds inside colony
    masks) seen in Nomarski DIC (bias-retarded interference of two sheared copies of the phase,
    i.e. a 45 degree directional derivative around a bias) and a CellMask-like membrane stain.
:func:`make_fucci_spheroid`
    A dense spheroid of nuclei at 5 um z-steps with FUCCI reporters (Cy3 / mKO2-hCdt1 in G1,
    GFP / mAG-hGeminin in S/G2/M, both at G1/S, neither in early G1) plus Hoechst, dimming
    with depth and towards the spheroid centre (scattering).

``write_dataset_3d``, ``write_dataset_2d_isl``, ``write_dataset_2d_dic`` and
``write_fucci_dataset`` write OME-TIFF files with voxel sizes and CSV manifests whose paths
are relative to the CSV's folder.
"""

from common.synthetic.cell_field import cell_field_params, make_cell_field_3d
from common.synthetic.dic import make_dic_membrane_2d
from common.synthetic.fucci import PHASE_NAMES, make_fucci_spheroid
from common.synthetic.isl2d import make_isl_2d
from common.synthetic.optics import blur_wide, camera_noise, ellipsoid_rho, gaussian_psf_blur, random_rotation, smooth_noise
from common.synthetic.writers import write_dataset_2d_dic, write_dataset_2d_isl, write_dataset_3d, write_fucci_dataset

__all__ = [
    "PHASE_NAMES", "smooth_noise", "random_rotation", "ellipsoid_rho", "gaussian_psf_blur", "blur_wide", "camera_noise",
    "cell_field_params", "make_cell_field_3d", "make_isl_2d", "make_dic_membrane_2d", "make_fucci_spheroid",
    "write_dataset_3d", "write_dataset_2d_isl", "write_dataset_2d_dic", "write_fucci_dataset",
]
