# Triton for a repository whose scorer is the ANN index (export --retrieval ann, or a catalogue
# above export_scripts.export.ANN_MIN_ITEMS): the NGC image's Python backend runs
# scorer/1/model.py, which needs numpy and faiss. Set helm value triton.image to this image.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}
RUN pip install --no-cache-dir numpy==2.4.6 faiss-cpu==1.15.1
