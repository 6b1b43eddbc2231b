// The Python module fusedrnn._C_emu: the cuda backend built as host C++ (csrc/emu/), whose static registrations
// add the ops fusedrnn::cuda_emu_* (CPU tensors). Separate from fusedrnn._C so that the real CUDA ops and these
// never collide, and so that a build without it loses nothing else.
#include <Python.h>

static struct PyModuleDef fusedrnn_emu_module = {PyModuleDef_HEAD_INIT, "_C_emu", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C_emu(void) {
  PyObject* module = PyModule_Create(&fusedrnn_emu_module);
  if (module == nullptr) return nullptr;
#if defined(FUSEDRNN_EMU_UCONTEXT)
  PyModule_AddStringConstant(module, "FIBERS", "ucontext");
#else
  PyModule_AddStringConstant(module, "FIBERS", "boost.context");
#endif
  return module;
}
