/* The BPF target has no asm/ of its own; these map the UAPI headers to
 * their generic forms so the build does not depend on the host arch. */
#pragma once
#include <asm-generic/errno.h>
