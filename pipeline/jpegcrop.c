/* Decode one rectangle of a JPEG: libjpeg-turbo's cropped decode (jpeg_crop_scanline and
 * jpeg_skip_scanlines), which the paper's random crop needs and neither PIL nor torchvision
 * offer. Rows above the rectangle are entropy-decoded only, rows below are not read, and
 * columns outside the rectangle's iMCU columns skip the IDCT and colour conversion.
 *
 *   size(jpeg) -> (width, height)
 *   decode(jpeg, left, top, width, height, scale_denom, max_pixels) -> bytearray of
 *       height*width*3 RGB; refuses a JPEG whose header claims more than max_pixels pixels
 *
 * The rectangle is in the pixels of the image as decoded at 1/scale_denom (1, 2, 4 or 8).
 * Warnings (for example a missing end marker) are ignored, as PIL does; errors raise
 * ValueError with libjpeg's message.
 *
 * A JPEG's header says how big it is, and a few kilobytes can claim 65500 x 65500 pixels:
 * decoding it whole asks for 13 GB of RGB, and jpeg_start_decompress alone allocates the
 * whole image's DCT coefficients (13 to 26 GB) for a progressive or multi-scan JPEG, however
 * small the crop. So decode checks the header's pixel count before jpeg_start_decompress.
 * That bounds everything it allocates: the coefficients are 2 bytes a pixel per component
 * (at most 3 components for RGB output), the RGB out 3 bytes a pixel, and the row buffers
 * grow with the width, which libjpeg caps at 65500. The caller gives the limit with every call
 * (pipeline/transforms.py: MAX_PIXELS): the module keeps no state. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

struct error_handler {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct error_handler *handler = (struct error_handler *)cinfo->err;
    handler->pub.format_message(cinfo, handler->message);
    longjmp(handler->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    (void)cinfo;
    (void)level;
}

static void create_decompressor(struct jpeg_decompress_struct *cinfo, struct error_handler *handler) {
    cinfo->err = jpeg_std_error(&handler->pub);
    handler->pub.error_exit = on_error;
    handler->pub.emit_message = on_message;
    jpeg_create_decompress(cinfo);
}

static PyObject *jpeg_size(PyObject *module, PyObject *args) {
    Py_buffer data;
    struct jpeg_decompress_struct cinfo;
    struct error_handler handler;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*", &data)) return NULL;
    create_decompressor(&cinfo, &handler);
    if (setjmp(handler.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "not a JPEG libjpeg can read: %s", handler.message);
    }
    jpeg_mem_src(&cinfo, data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    PyObject *size = Py_BuildValue("(II)", cinfo.image_width, cinfo.image_height);
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return size;
}

static PyObject *jpeg_decode(PyObject *module, PyObject *args) {
    Py_buffer data;
    int left, top, width, height, scale_denom;
    struct jpeg_decompress_struct cinfo;
    struct error_handler handler;
    PyObject *volatile pixels = NULL;
    JSAMPROW volatile row = NULL;
    (void)module;
    long long max_pixels;
    if (!PyArg_ParseTuple(args, "y*iiiiiL", &data, &left, &top, &width, &height, &scale_denom, &max_pixels)) return NULL;
    if (scale_denom != 1 && scale_denom != 2 && scale_denom != 4 && scale_denom != 8) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "scale_denom %d; valid: 1, 2, 4, 8", scale_denom);
    }
    if (max_pixels < 1) {
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "max_pixels %lld; it must be at least 1", max_pixels);
    }
    create_decompressor(&cinfo, &handler);
    if (setjmp(handler.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyMem_Free(row);
        Py_XDECREF(pixels);
        PyBuffer_Release(&data);
        return PyErr_Format(PyExc_ValueError, "JPEG decode failed: %s", handler.message);
    }
    jpeg_mem_src(&cinfo, data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    /* The header is read, nothing the size of the image is allocated yet. */
    if ((unsigned long long)cinfo.image_width * cinfo.image_height > (unsigned long long)max_pixels) {
        PyErr_Format(PyExc_ValueError, "%u x %u pixels, over the decoder's limit of %lld pixels", cinfo.image_width,
                     cinfo.image_height, max_pixels);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale_denom;
    jpeg_start_decompress(&cinfo);
    if (left < 0 || top < 0 || width <= 0 || height <= 0 || (JDIMENSION)(left + width) > cinfo.output_width ||
        (JDIMENSION)(top + height) > cinfo.output_height) {
        PyErr_Format(PyExc_ValueError, "rectangle (%d, %d, %d x %d) is outside the %u x %u image", left, top, width,
                     height, cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&data);
        return NULL;
    }
    /* libjpeg widens the columns to whole iMCUs, starting at or left of the first one asked for.
     * Chroma upsampling replicates the edge columns of what it decodes: ask for one more column
     * on each side so the rectangle's own edge pixels come out as in a full decode. */
    JDIMENSION first_column = (JDIMENSION)(left > 0 ? left - 1 : 0);
    JDIMENSION last_column = (JDIMENSION)left + (JDIMENSION)width + 1;
    if (last_column > cinfo.output_width) last_column = cinfo.output_width;
    JDIMENSION columns = last_column - first_column;
    jpeg_crop_scanline(&cinfo, &first_column, &columns);
    row = PyMem_Malloc((size_t)columns * 3);
    pixels = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)width * height * 3);
    if (row == NULL || pixels == NULL) {
        jpeg_destroy_decompress(&cinfo);
        PyMem_Free(row);
        Py_XDECREF(pixels);
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    char *out = PyByteArray_AS_STRING(pixels);
    if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    for (int y = 0; y < height; y++) {
        JSAMPROW rows[1] = {row};
        jpeg_read_scanlines(&cinfo, rows, 1);
        memcpy(out + (size_t)y * width * 3, row + (size_t)(left - (int)first_column) * 3, (size_t)width * 3);
    }
    /* The rows below the rectangle are never decoded: abort rather than finish. */
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    PyMem_Free(row);
    PyBuffer_Release(&data);
    return pixels;
}

static PyMethodDef methods[] = {
    {"size", jpeg_size, METH_VARARGS, "size(jpeg) -> (width, height)"},
    {"decode", jpeg_decode, METH_VARARGS,
     "decode(jpeg, left, top, width, height, scale_denom, max_pixels) -> bytearray of RGB rows"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "jpegcrop", "Cropped JPEG decode (libjpeg-turbo).", -1,
                                    methods};

PyMODINIT_FUNC PyInit_jpegcrop(void) { return PyModule_Create(&module); }
