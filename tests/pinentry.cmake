# service/pinentry.c against real child processes: the scripted pinentry
# stand-in (tests/softhsm/pinentry_standin.py) in every behaviour, and the
# real pinentry-curses on a pseudo-terminal when it is installed.
add_executable(test_pinentry ${CMAKE_CURRENT_SOURCE_DIR}/test_pinentry.c)
target_link_libraries(test_pinentry PRIVATE smime_service)
add_test(NAME pinentry_unit
  COMMAND test_pinentry ${CMAKE_CURRENT_SOURCE_DIR}/softhsm/pinentry_standin.py)
set_tests_properties(pinentry_unit PROPERTIES TIMEOUT 120)
