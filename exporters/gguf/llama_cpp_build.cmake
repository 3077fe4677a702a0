# Included after every project() of llama-cpp-python's build (make install passes it as
# CMAKE_PROJECT_INCLUDE). llama-cpp-python forces LLAMA_BUILD_COMMON ON, but its bindings load only
# libllama and ggml: llama.cpp's "common" library (chat parsers, jinja, argument parsing) is half
# of the build's compile time and nothing here loads it.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp's common library: not loaded by the bindings" FORCE)
