/* The BPF target has no asm/ of its own; these map the UAPI headers to
 * their generic forms so the build does not depend on the host arch. */
#pragma once
/* servicepath builds bpfel only. */
#include <linux/byteorder/little_endian.h>
