/* Small helpers shared by the core's translation units. */
#ifndef CECOLLM_UTIL_H
#define CECOLLM_UTIL_H

#include <stdarg.h>
#include <stdio.h>

#include "cecollm/cecollm.h"

/* Writes a message into err (when given) and returns status. */
static inline ce_status ce_fail(char *err, size_t errlen, ce_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

static inline ce_status ce_fail(char *err, size_t errlen, ce_status status, const char *fmt, ...) {
    if (err != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return status;
}

#endif
